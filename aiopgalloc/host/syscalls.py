"""Thin wrappers over the Linux calls the allocator needs.

Every wrapper first consults the fault-injection seam (``faults.check(op)``),
then makes one system call: through ``os`` where Python has it, through ctypes
on libc otherwise.  Failures come out as ``OSError`` carrying the kernel's
errno.  The ctypes calls release the GIL, so a long fallocate or mincore in a
worker thread does not stall the event loop's thread.

What the kernel does with these calls, and what follows for the allocator:

- Punching a hole (fallocate PUNCH_HOLE|KEEP_SIZE) costs in proportion to the
  pages it actually frees; a page that is already a hole costs about half.
  Linux serialises fallocate on one shmem file, so one huge punch also holds
  up other punches and commits of the same file: the releaser punches in
  batches of bounded size (the reference caps a call at 128 MiB).
- A batch of punches saves little on the thread that makes them.  What it
  saves is thread hops: a hop to a worker thread and back costs as much as
  a hundred small punches, and wakes the loop once.  So the releaser decides
  its ranges under the lock, hops once, and punches the whole batch there
  (``punch_holes``).
- A committed-but-never-written shmem page counts in ``st_blocks`` but is
  neither reported resident by ``mincore`` nor found by ``SEEK_DATA``; only
  ``fstat_blocks_bytes`` sees it.  It reads as zeros, so a checkpoint that
  skips it loses nothing.
- ``mincore`` fills one byte per page of the span whatever is resident, and
  ``SEEK_DATA``/``SEEK_HOLE`` steps through every page of a data run: both
  are cheap on sparse or contiguous files and grow with the span scanned,
  so usage scans over large files run off the event loop.
- Zeroing resident pages by hand (``memset_zero``) is far cheaper than
  punching them and faulting fresh pages in on the next touch: that is why
  freed pages are recycled before they are released.
- ``faults.check`` costs a fraction of a microsecond when nothing is armed.

The measured costs on the project's machines are in
``benchmarks/results/host-costs.md``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from aiopgalloc.host.faults import faults
from aiopgalloc.host.hugepage import PAGE_SIZE

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "MADV_DONTNEED",
    "MADV_POPULATE_READ",
    "MADV_POPULATE_WRITE",
    "MADV_REMOVE",
    "commit",
    "data_ranges",
    "fallocate",
    "fstat_blocks_bytes",
    "madvise",
    "memset_zero",
    "mincore",
    "punch_hole",
    "punch_holes",
]

FALLOC_FL_KEEP_SIZE = 1
"""fallocate flag: do not change the file size, even past the end of file."""
FALLOC_FL_PUNCH_HOLE = 2
"""fallocate flag: free the blocks of the range (must be used with KEEP_SIZE)."""

MADV_DONTNEED = 4
"""madvise: drop this mapping's page table entries (shared file pages stay)."""
MADV_REMOVE = 9
"""madvise: free the backing store of a shared mapping, like a hole punch."""
MADV_POPULATE_READ = 22
"""madvise (Linux 5.14+): fault the range in for reading."""
MADV_POPULATE_WRITE = 23
"""madvise (Linux 5.14+): fault the range in for writing, allocating pages."""

_libc = ctypes.CDLL(None, use_errno=True)

# glibc exports fallocate64 on every ABI; on 64-bit ABIs it is the same
# function as fallocate, on 32-bit ones only it takes a 64-bit offset.
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_mincore.restype = ctypes.c_int

_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int


def _errno_error() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call ``fallocate(2)`` on ``fd`` (fault op ``fallocate``).

    ``mode`` is a combination of the ``FALLOC_FL_*`` flags.  Cost: see the
    module comment; the GIL is released during the call.  Raises ``OSError``
    with the kernel's errno (``EINVAL`` for a zero or negative length or a
    negative offset, ``ENOSPC``/``ENOMEM`` when memory runs out, ``EBADF``).
    """
    faults.check("fallocate")
    if _fallocate(fd, mode, offset, length) != 0:
        raise _errno_error()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of ``[offset, offset+length)``; the range reads as zeros.

    ``fallocate(PUNCH_HOLE | KEEP_SIZE)``: the file size never changes.  Cost
    grows with the committed pages inside the range (about 5-8 us for one
    4 KiB page, 0.3 ms for 2 MiB).  Raises ``OSError`` as :func:`fallocate`.
    """
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def punch_holes(fd: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int, OSError]]:
    """Punch every ``(start, end)`` range in order; return the ones that failed.

    One range failing (including a malformed one, which the kernel rejects
    with ``EINVAL``) does not stop the others: each failure is returned as
    ``(start, end, error)``, so a whole batch costs one thread hop and the
    caller decides what to retry.  Never raises ``OSError``.  Cost: the sum of
    the single punches, with no per-range Python overhead beyond a few
    hundred nanoseconds.
    """
    failed: list[tuple[int, int, OSError]] = []
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    for start, end in ranges:
        try:
            faults.check("fallocate")
        except OSError as exc:
            failed.append((start, end, exc))
            continue
        if _fallocate(fd, mode, start, end - start) != 0:
            failed.append((start, end, _errno_error()))
    return failed


def commit(fd: int, offset: int, length: int) -> None:
    """Allocate backing pages for ``[offset, offset+length)`` without writing them.

    ``fallocate(KEEP_SIZE)``: the pages are allocated (zero-filled) and count
    in the file's blocks, but the file size is left alone, so the caller must
    stay inside the size it set.  Cost about 1-1.4 us per 4 KiB page.  Raises
    ``OSError`` (``ENOSPC``/``ENOMEM`` when memory runs out) as :func:`fallocate`.
    """
    fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)


def fstat_blocks_bytes(fd: int) -> int:
    """Return the bytes of backing store the file really holds (``st_blocks * 512``).

    Fault op ``fstat``.  Cost: one syscall, a few microseconds.  Raises ``OSError`` (``EBADF``).
    """
    faults.check("fstat")
    return os.fstat(fd).st_blocks * 512


def mincore(
    addr: int, length: int, vec: bytearray | None = None, *, vec_offset: int = 0
) -> bytearray:
    """Report which pages of the mapping at ``[addr, addr+length)`` are resident.

    One byte per page (``length`` rounded up to whole pages), bit 0 set when
    the page is in memory; for a shared file mapping that means "in the
    file's page cache", whoever touched it.  The result is written into
    ``vec`` starting at ``vec_offset`` when given (and ``vec`` is returned),
    else into a new bytearray.  Fault op ``mincore``.  Cost about 11-15 ms per
    GiB scanned, with the GIL released.

    Raises ``ValueError`` when ``addr`` is not page-aligned, ``length`` is
    negative or ``vec`` is too short, ``OSError`` (``ENOMEM``: part of the
    range is not mapped).
    """
    if addr % PAGE_SIZE:
        raise ValueError(f"mincore address {addr:#x} is not page-aligned")
    if length < 0:
        raise ValueError(f"negative length {length}")
    pages = -(-length // PAGE_SIZE)
    if vec is None:
        vec = bytearray(pages)
        vec_offset = 0
    elif vec_offset < 0 or len(vec) - vec_offset < pages:
        raise ValueError(f"vec has room for {len(vec) - vec_offset} pages, {pages} needed")
    faults.check("mincore")
    if pages == 0:
        return vec
    # The ctypes array borrows the bytearray's buffer (the bytearray cannot be
    # resized while it exists), so the kernel writes straight into it.
    out = (ctypes.c_ubyte * pages).from_buffer(vec, vec_offset)
    try:
        rc = _mincore(addr, length, out)
    finally:
        del out
    if rc != 0:
        raise _errno_error()
    return vec


def madvise(addr: int, length: int, advice: int) -> None:
    """Call ``madvise(2)`` on ``[addr, addr+length)`` (fault op ``madvise``).

    ``addr`` must be page-aligned (else the kernel answers ``EINVAL``).  Cost
    depends on ``advice``: ``MADV_POPULATE_WRITE`` about 3-6 us per page.
    Raises ``OSError`` (``EINVAL`` for an unknown advice on older kernels,
    ``ENOMEM`` for an unmapped range, ``EFAULT``/``EHWPOISON`` on populate).
    """
    faults.check("madvise")
    if _madvise(addr, length, advice) != 0:
        raise _errno_error()


def memset_zero(addr: int, length: int) -> None:
    """Write ``length`` zero bytes at ``addr`` (fault op ``memset``).

    Used to zero recycled pages in place: a plain C ``memset`` with the GIL
    released, about memory bandwidth (a few GB/s) on pages already resident;
    pages not yet resident are faulted in first.  The caller guarantees that
    ``[addr, addr+length)`` is mapped writable for the whole call: writing to
    an unmapped address kills the process.  Raises ``ValueError`` for a null
    address or a negative length.
    """
    if addr == 0:
        raise ValueError("memset_zero on a null address")
    if length < 0:
        raise ValueError(f"negative length {length}")
    faults.check("memset")
    if length:
        ctypes.memset(addr, 0, length)


def seek_data(fd: int, offset: int) -> int | None:
    """The first offset at or after ``offset`` that holds data, or None.

    One ``lseek(SEEK_DATA)`` (fault op ``lseek``).  On shmem, skipping holes
    is cheap (2-3 us per empty GiB), so this is bounded; SEEK_HOLE is not:
    finding the end of a data run walks the whole run, which can be far past
    the range a caller cares about (1.7 ms for 256 MiB measured here).
    Raises ``OSError`` for errors other than ``ENXIO`` (no data after it).
    """
    faults.check("lseek")
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Return the committed runs of the file inside ``[start, end)``, in order.

    Walks ``lseek(SEEK_DATA)`` / ``lseek(SEEK_HOLE)`` (fault op ``lseek``);
    each run is clipped to ``[start, end)``.  Cost: two lseek calls per run
    (about 2-3 us for an empty GiB, about 1 ms for 128 MiB of scattered data),
    and SEEK_HOLE walks a data run to its end even past ``end``: on shmem it
    costs time in proportion to the committed bytes it crosses.
    The walk moves the file offset shared by every fd of this open file
    description; the allocator only uses positional I/O, so that is harmless.
    Raises ``ValueError`` for a negative start or end before start,
    ``OSError`` for lseek errors other than ``ENXIO`` (which ends the walk).
    """
    if start < 0 or end < start:
        raise ValueError(f"bad range [{start}, {end})")
    faults.check("lseek")
    runs: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            # Only reachable if the file shrank under us between the calls.
            if exc.errno == errno.ENXIO:
                break
            raise
        runs.append((data, min(hole, end)))
        pos = hole
    return runs
