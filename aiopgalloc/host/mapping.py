"""One shared mapping of a whole memory file, in one reserved address range.

The file is mapped ``MAP_SHARED``, read-write, at the start of a range of
address space reserved for it, so byte ``i`` of the file is at
``base + i`` for every ``i`` below the file's size.  A memoryview of any
range of the file is then one slice of one memoryview, and mincore, memset
and madvise cover any range in one call.

The kernel facts this rests on, and what follows from each:

- A ``MAP_SHARED`` file mapping holds a reference to the open file, not a
  file descriptor: once mapped, the memory stays valid after every fd of the
  file is closed, and mapping the file costs no fd however large it grows.
  (Python's ``mmap.mmap`` keeps a private ``dup`` of the fd per mapping; a
  mapping per chunk therefore held one fd per chunk, and a large file could
  exhaust ``RLIMIT_NOFILE``.  That is why the mappings are made with raw
  ``mmap(2)`` through ctypes, and why the class is a ``FileMapping`` and no
  longer a table of per-chunk mappings.)
- A private anonymous mapping with ``PROT_NONE`` and ``MAP_NORESERVE`` costs
  no memory and no commit charge, only one VMA and the address space; making
  or dropping one costs a few microseconds whatever its size.  The range is
  reserved that way, much larger than the file (at least
  :data:`RESERVATION_MIN`), aligned to ``HUGE_PAGE_SIZE`` so that shmem huge
  pages can be mapped by a PMD.
- ``mmap(MAP_FIXED)`` replaces whatever is mapped at the address it is given.
  Inside a reservation we own, that is how the file is mapped, and how a
  grown file's new part is mapped on first use: the new VMA merges with the
  one before it.  Outside memory we own it would silently unmap someone
  else's; so MAP_FIXED is only ever aimed at our own reservation, and after a
  failed MAP_FIXED (some kernels have already unmapped the target by then)
  the range is taken back with ``MAP_FIXED_NOREPLACE`` or, when that is
  refused, written off: never unmapped by us and never mapped into again.
- Touching a shared mapping past the end of its file raises SIGBUS and kills
  the process.  So the file is mapped only up to the size the caller
  declared with :meth:`FileMapping.set_file_size` (and an fstat confirms the
  file really is that long before mapping it); the rest of the reservation
  stays ``PROT_NONE``, and no view or raw address ever reaches past the
  mapped part.
- Two shared mappings of one file see the same pages.  When the file
  outgrows its reservation, a new, larger reservation is made (twice the
  old one at least), the whole file is mapped there and lookups switch to it;
  the old reservation stays mapped, coherent with the new one, for as long
  as anything still points into it.

Finding the pages that hold memory: two kernel interfaces answer it for a
shmem file.  ``lseek(SEEK_DATA/SEEK_HOLE)`` looks cheap, but on shmem
SEEK_HOLE walks a data run to its end, wherever that is, so asking about a
small range next to a large committed region costs time in proportion to
that region, for every range asked about.  ``mincore`` on the mapping costs
in proportion to the range asked about and nothing else (one byte per
page), so :meth:`FileMapping.resident_runs` uses it, as the reference does.
It does not see pages swapped out, nor pages committed by ``fallocate`` and
never written; fstat's block count sees both, which is why the allocator
compares with fstat before it scans.

Lifetime: each reservation is a ``_Region`` that unmaps its address range
when it is garbage-collected, and nothing else unmaps it.  A ctypes array
made with ``from_address`` over the region carries a reference to it, and a
memoryview of that array (or of any slice of one) keeps the array alive, so
a view handed out keeps its region mapped however long it outlives
:meth:`FileMapping.close`; the region goes with the last view.  Calls on raw
addresses (memset, mincore, madvise) hold a reference to the region in a
local for their duration, so neither a concurrent close nor a switch to a
new reservation can unmap memory under them.  A region is unmapped by
whichever thread drops its last reference; tearing down the page tables of
a large, well-touched mapping costs tens of milliseconds per GiB, which is
why reservations start large and double.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import weakref
from collections.abc import Callable

from aiopgalloc.host import syscalls
from aiopgalloc.host.faults import faults
from aiopgalloc.host.hugepage import HUGE_PAGE_SIZE, PAGE_SIZE

__all__ = ["RESERVATION_MIN", "FileMapping"]

# mincore defines only bit 0 of each byte ("resident"): map every byte to 0/1.
_RESIDENT = bytes(i & 1 for i in range(256))

RESERVATION_MIN = 64 << 30
"""The smallest address range reserved for a file (64 GiB).

A reservation costs a VMA and address space, no memory, so a file smaller
than this never moves to a new reservation (each move re-faults every page
the user touches afterwards and tears down the old page tables); and the
2**47 bytes of user address space on x86-64 still hold about two thousand
such files.  Where the address space is capped (``RLIMIT_AS``) and the
reservation fails with ``ENOMEM``, smaller ones are tried, halving down to
the file's own size."""

_PROT_NONE = 0
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_NORESERVE = 0x4000
_MAP_FIXED = 0x10
_MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17+; older kernels take it as a hint
_RESERVE_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def _sys_mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """One ``mmap(2)``, no fault check: the address, or ``OSError``."""
    r = _mmap(addr, length, prot, flags, fd, offset)
    if r is None or r == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(r)


def _raw_mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """``faults.check("mmap")``, then one ``mmap(2)``."""
    faults.check("mmap")
    return _sys_mmap(addr, length, prot, flags, fd, offset)


class _Region:
    """A reserved address range; unmapped when the last reference goes.

    ``addr`` and ``length`` are the usable, ``HUGE_PAGE_SIZE``-aligned range;
    ``mapped`` is how much of the file is mapped at ``addr`` (changed only
    under the owning FileMapping's lock).  ``spans`` are the ranges this
    object owns and will unmap: normally one, minus any range written off
    after a failed MAP_FIXED.
    """

    __slots__ = ("__weakref__", "addr", "length", "mapped", "spans", "whole")

    def __init__(self, length: int) -> None:
        """Reserve ``length`` bytes (a multiple of HUGE_PAGE_SIZE), aligned.

        Over-reserves by one huge page and trims the ends.  Raises
        ``OSError`` from mmap (``ENOMEM``: address space or map count).
        """
        self.spans: list[tuple[int, int]] = []
        self.mapped = 0
        self.whole = True
        raw_len = length + HUGE_PAGE_SIZE
        raw = _raw_mmap(None, raw_len, _PROT_NONE, _RESERVE_FLAGS, -1, 0)
        self.spans.append((raw, raw_len))
        addr = -(-raw // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
        head, tail = addr - raw, raw + raw_len - (addr + length)
        # Trimming only shrinks one VMA, so it does not fail in practice;
        # if it does, the slack simply stays ours and goes with the rest.
        if head and _munmap(raw, head) == 0:
            self._drop(raw, head)
        if tail and _munmap(addr + length, tail) == 0:
            self._drop(addr + length, tail)
        self.addr = addr
        self.length = length

    def _drop(self, start: int, n: int) -> None:
        """Stop owning ``[start, start+n)``: split the spans around it."""
        end = start + n
        out: list[tuple[int, int]] = []
        for s, sn in self.spans:
            e = s + sn
            if s < start:
                out.append((s, min(e, start) - s))
            if e > end:
                out.append((max(s, end), e - max(s, end)))
        self.spans = out

    def write_off(self, start: int, n: int) -> None:
        """A MAP_FIXED over ``[start, start+n)`` failed and the range could
        not be taken back: it may belong to someone else now.  Never unmap
        it, and never map into this region again."""
        self._drop(start, n)
        self.whole = False

    def __del__(self, _munmap: Callable[[int, int], int] = _munmap) -> None:
        # Bound as a default: at interpreter exit module globals may be gone.
        for s, n in self.spans:
            _munmap(s, n)


def _map_file(region: _Region, fd: int, offset: int, length: int) -> None:
    """Map the file's ``[offset, offset+length)`` at ``region.addr + offset``
    (fault op ``mmap``).

    When the kernel refuses, the target is retaken as PROT_NONE with
    MAP_FIXED_NOREPLACE (which succeeds only where the failing call left a
    hole), else written off; then the error is raised.
    """
    addr = region.addr + offset
    # An injected fault fires here, before the syscall: nothing to retake.
    faults.check("mmap")
    try:
        _sys_mmap(addr, length, _PROT_RW, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    except OSError:
        _retake(region, addr, length)
        raise


def _retake(region: _Region, addr: int, length: int) -> None:
    try:
        got = _raw_mmap(addr, length, _PROT_NONE, _RESERVE_FLAGS | _MAP_FIXED_NOREPLACE, -1, 0)
    except OSError:
        # EEXIST: the range is still mapped, most likely still by our
        # reservation (newer kernels restore it), but we cannot tell.
        region.write_off(addr, length)
        return
    if got != addr:
        # A kernel without MAP_FIXED_NOREPLACE placed it elsewhere.
        _munmap(got, length)
        region.write_off(addr, length)


class _State:
    """What a lock-free reader loads in one go: the region and views of it.

    ``rw``/``ro`` cover exactly the mapped ``[0, mapped)`` of the file, and
    so does the ctypes array behind them (a view's ``.obj``): nothing handed
    out reaches the PROT_NONE part.  Holding a ``_State``, or any view of
    it, keeps its region mapped.
    """

    __slots__ = ("addr", "mapped", "region", "ro", "rw")

    def __init__(self, region: _Region | None, mapped: int) -> None:
        self.region = region
        self.mapped = mapped
        if region is None or mapped <= 0:
            self.addr = 0
            self.rw = memoryview(bytearray())
        else:
            self.addr = region.addr
            # The array carries the region: views of it keep it mapped.
            arr = (ctypes.c_ubyte * mapped).from_address(region.addr)
            arr._keep = region  # type: ignore[attr-defined]
            self.rw = memoryview(arr).cast("B")
        self.ro = self.rw.toreadonly()


# Closed: ``mapped`` below any valid end sends every call to the slow path.
_CLOSED = _State(None, -1)


class FileMapping:
    """A shared read-write mapping of a whole file, grown on first use.

    The fd is borrowed: the caller keeps owning and closing it, after
    :meth:`close`.  No fd is duplicated, whatever the file's size.
    Thread-safe: a private ``threading.Lock`` serialises mapping (growth and
    moving to a new reservation); calls inside the part already mapped take
    no lock (they load the current state in one read).
    """

    def __init__(self, fd: int, chunk_size: int) -> None:
        """Map ``fd`` (lazily) in steps of ``chunk_size`` bytes.

        Nothing is reserved or mapped yet and the known file size is 0 (see
        :meth:`set_file_size`).  ``chunk_size`` is the unit of file sizes
        and the piece size of :meth:`views`.  Raises ``ValueError`` unless
        ``chunk_size`` is a power of two and a multiple of ``PAGE_SIZE``.
        """
        if chunk_size < PAGE_SIZE or chunk_size & (chunk_size - 1):
            raise ValueError(
                f"chunk_size must be a power of two multiple of {PAGE_SIZE}, got {chunk_size}"
            )
        self._fd = fd
        self.chunk_size: int = chunk_size
        """The unit of file sizes, and the piece size of :meth:`views`."""
        self._mask = chunk_size - 1
        self._lock = threading.Lock()
        self._size = 0
        self._closed = False
        # Replaced, never mutated, so one load gives a consistent snapshot.
        self._cur = _State(None, 0)
        # Every region ever made, to count those still pinned.
        self._regions: list[weakref.ref[_Region]] = []

    @property
    def file_size(self) -> int:
        """The file size last given to :meth:`set_file_size` (a whole number of chunks)."""
        return self._size

    @property
    def mapped_bytes(self) -> int:
        """How much of the file the current region maps (0 after :meth:`close`)."""
        return max(self._cur.mapped, 0)

    @property
    def reserved_bytes(self) -> int:
        """The size of the current reservation (0 before first use and after :meth:`close`)."""
        region = self._cur.region
        return 0 if region is None else region.length

    @property
    def regions(self) -> int:
        """How many reservations are still mapped: the current one (while
        open) plus old ones pinned by live views or calls in progress."""
        with self._lock:
            refs = list(self._regions)
        return sum(1 for r in refs if r() is not None)

    def set_file_size(self, size: int) -> None:
        """Record that the caller grew the file to ``size`` bytes.

        Nothing is mapped here: the new part is mapped by the first call
        that needs it.  A size not above the known one is ignored.  Cost:
        constant.  Raises ``ValueError`` when ``size`` is negative or not a
        multiple of ``chunk_size``, or after :meth:`close`.
        """
        if size < 0 or size & self._mask:
            raise ValueError(
                f"file size {size} is not a whole number of {self.chunk_size}-byte chunks"
            )
        with self._lock:
            if self._closed:
                raise ValueError("FileMapping is closed")
            self._size = max(self._size, size)

    # ---------------------------------------------------------------- lookup

    def _state(self, offset: int, length: int) -> _State:
        """The state whose views cover ``[offset, offset+length)``, mapping
        more of the file first if needed (an empty range maps nothing)."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        end = offset + length
        with self._lock:
            if self._closed:
                raise ValueError("FileMapping is closed")
            if end > self._size:
                raise IndexError(f"range [{offset}, {end}) is past the file size {self._size}")
            cur = self._cur
            if end <= cur.mapped or length == 0:
                return cur
            new = self._map_locked(cur)
            self._cur = new
        # The old state (and maybe its region) is dropped by the caller, off
        # the lock: unmapping a large region is not free.
        return new

    def _map_locked(self, cur: _State) -> _State:
        """Map the file up to ``self._size``: in place when the reservation
        has room, else in a new reservation.  Precondition: lock held.
        Raises ``ValueError`` when the file is shorter than declared,
        ``OSError`` from mmap; nothing changes then."""
        size = self._size
        st_size = os.fstat(self._fd).st_size
        if st_size < size:
            raise ValueError(
                f"the file is {st_size} bytes, shorter than the declared size {size}: "
                "mapping it would risk SIGBUS"
            )
        region = cur.region
        if region is not None and region.whole and size <= region.length:
            _map_file(region, self._fd, region.mapped, size - region.mapped)
            region.mapped = size
            return _State(region, size)
        region = self._reserve(size, 0 if region is None else region.length)
        _map_file(region, self._fd, 0, size)
        region.mapped = size
        self._regions = [r for r in self._regions if r() is not None]
        self._regions.append(weakref.ref(region))
        return _State(region, size)

    @staticmethod
    def _reserve(size: int, previous: int) -> _Region:
        """A new region for a file of ``size`` bytes: the next power of two
        holding twice the file, at least RESERVATION_MIN and twice the
        previous reservation.  On ENOMEM (capped address space), halve down
        to the file's own size before giving up."""
        need = -(-size // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
        length = max(RESERVATION_MIN, 2 * previous, 1 << (2 * need - 1).bit_length())
        while True:
            try:
                return _Region(length)
            except OSError as exc:
                if exc.errno != errno.ENOMEM or length <= need:
                    raise
                length = max(length // 2, need)

    # ----------------------------------------------------------------- views

    def view(self, offset: int, length: int, writable: bool) -> memoryview:
        """Return one memoryview of ``[offset, offset+length)`` of the file.

        Any range inside the file, across chunks or not; read-only unless
        ``writable``.  The view keeps its memory mapped however long it
        lives, even past :meth:`close`.  Cost: one slice of a memoryview
        (well under a microsecond) when the range is mapped already; the
        first call past the mapped part maps the rest of the file (an fstat
        and one mmap, a few microseconds; two more when the file outgrew its
        reservation).  Raises ``ValueError`` for a negative offset or length
        or after :meth:`close` (or when the file is shorter than
        :meth:`set_file_size` claimed), ``IndexError`` past the known file
        size, ``OSError`` when mmap fails (``ENOMEM``: address space or map
        count exhausted).
        """
        cur = self._cur
        end = offset + length
        if offset < 0 or length < 0 or end > cur.mapped:
            cur = self._state(offset, length)
        return cur.rw[offset:end] if writable else cur.ro[offset:end]

    def views(self, offset: int, length: int, writable: bool) -> list[memoryview]:
        """Return memoryviews covering exactly ``[offset, offset+length)``, in order.

        One view per ``chunk_size`` piece the range crosses (none for an
        empty range), as :meth:`view` otherwise (same lifetime, same
        errors).  Cost: a slice per piece.
        """
        cur = self._cur
        end = offset + length
        if offset < 0 or length < 0 or end > cur.mapped:
            cur = self._state(offset, length)
        base = cur.rw if writable else cur.ro
        chunk = self.chunk_size
        if 0 < length <= chunk - (offset & self._mask):
            return [base[offset:end]]
        out: list[memoryview] = []
        pos = offset
        while pos < end:
            n = min(chunk - (pos & self._mask), end - pos)
            out.append(base[pos : pos + n])
            pos += n
        return out

    # ------------------------------------------------------- raw-address calls

    def zero(self, offset: int, length: int) -> None:
        """Write zeros over ``[offset, offset+length)`` with one memset.

        No Python buffers are made (fault op ``memset``).  Cost about 15-20
        us per resident MiB, about 1 ms per MiB not yet resident (the pages
        are faulted in and committed).  Raises like :meth:`view`.
        """
        cur = self._cur
        if offset < 0 or length < 0 or offset + length > cur.mapped:
            cur = self._state(offset, length)
        if length:
            # ``cur`` pins the region until the call returns.
            syscalls.memset_zero(cur.addr + offset, length)

    def populate(self, offset: int, length: int) -> None:
        """Fault in (commit) ``[offset, offset+length)`` for writing, so the
        user's first writes take no page faults.

        One ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+; about 3-6 us per
        4 KiB page: the page faults are paid here, in one syscall).  Where
        the kernel refuses it (``EINVAL``), one zero byte is written per page
        instead, which commits the same pages; the caller guarantees the
        range reads as zero, so the bytes do not change.  Raises like
        :meth:`view`, and ``OSError`` from madvise (``ENOMEM``, ``EFAULT``)
        when memory runs out.
        """
        cur = self._cur
        if offset < 0 or length < 0 or offset + length > cur.mapped:
            cur = self._state(offset, length)
        if not length:
            return
        start = offset - offset % PAGE_SIZE
        try:
            syscalls.madvise(
                cur.addr + start, offset + length - start, syscalls.MADV_POPULATE_WRITE
            )
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # One byte per page, never outside the range the caller vouched for.
            rw = cur.rw
            rw[offset] = 0
            for off in range(start + PAGE_SIZE, offset + length, PAGE_SIZE):
                rw[off] = 0

    def mincore(self, offset: int, length: int) -> bytearray:
        """Return the residency of ``[offset, offset+length)``: one byte per page.

        Bit 0 of each byte is set when that page of the file is in memory
        (whoever touched it, through whichever mapping; pages committed by
        fallocate and never written show as not resident).  ``length`` is
        rounded up to whole pages.  One ``mincore`` (fault op ``mincore``);
        cost about 10-12 ms per GiB, so call it off the event loop for large
        ranges.  Raises ``ValueError`` when ``offset`` is not page-aligned,
        else like :meth:`view`.
        """
        if offset % PAGE_SIZE:
            raise ValueError(f"offset {offset} is not page-aligned")
        if length > 0:
            length = -(-length // PAGE_SIZE) * PAGE_SIZE
        cur = self._cur
        if offset < 0 or length < 0 or offset + length > cur.mapped:
            cur = self._state(offset, length)
        if not length:
            return bytearray()
        return syscalls.mincore(cur.addr + offset, length)

    # ---------------------------------------------------------------- closing

    def resident_runs(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The runs of pages inside ``spans`` (sorted, page-aligned) that hold
        memory, by mincore (see the module notes on why mincore and not
        SEEK_DATA/SEEK_HOLE).  Cost: one mincore per span, about 11 ms per
        GiB, then a C-level search of its answer: run it off the event loop
        for large spans.  Raises like :meth:`mincore`."""
        runs: list[tuple[int, int]] = []
        for s, e in spans:
            vec = self.mincore(s, e - s).translate(_RESIDENT)
            pos = 0
            n = len(vec)
            while pos < n:
                i = vec.find(1, pos)
                if i < 0:
                    break
                j = vec.find(0, i)
                if j < 0:
                    j = n
                runs.append((s + i * PAGE_SIZE, s + j * PAGE_SIZE))
                pos = j
        return runs

    def close(self) -> int:
        """Drop the mapping; return how many regions are still mapped.

        A region stays mapped while memoryviews of it (from :meth:`view` and
        :meth:`views`) are alive, or a call on it is still running in
        another thread; it is unmapped when the last of those goes.  Such
        regions are counted in the result.  Unmapping a region costs tens of
        milliseconds per GiB of it the process touched.  Idempotent (a
        second call returns 0).  Never raises.  After it, every other method
        raises ``ValueError``.
        """
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            cur = self._cur
            self._cur = _CLOSED
            refs = self._regions
        del cur
        return sum(1 for r in refs if r() is not None)
