"""Placement: where a new allocation goes, and how it takes its pages.

``MemoryFile.allocate`` runs these in order: ``find_range_locked`` chooses
the range (a decision, returned as data: the start and the freed pieces
inside it), then under the same hold of ``_mu`` the file grows if needed and
``take_waste_locked`` books the range as live; outside the lock
``zero_recycled`` zeroes what was recycled and ``commit_pages`` commits when
asked; ``punch_clean`` and ``undo_allocation`` put everything back when
either fails.  Functions named ``*_locked`` need ``MemoryFile._mu`` held;
the others take it themselves when they need it, and never across a syscall.

Recycling
---------
First fit runs over the usage set's gaps, which hold clean pages and freed
("waste") pages alike, so an allocation may land on pages freed earlier and
not yet released.  Zeroing those by hand (a memset, about 20 us per resident
MiB here) beats punching them (5 us per call) and faulting them back in on
the user's first write (3.6 us per 4 KiB page here).  Freed pages not known
to be committed are first probed with one SEEK_DATA, so that pages never
touched are not faulted in only to be zeroed.

Large requests (over ``opts.recycle_max_bytes``) look for clean room inside
the file first, a bounded number of tries, since zeroing megabytes on the
caller's thread costs more than a user may expect of a synchronous call; they
recycle when the alternative is to grow the file.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .host import cgroup, syscalls
from .options import CommitMode
from .ranges import FileRange
from .usage import LIVE, MemoryKind

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = [
    "commit_pages",
    "find_range_locked",
    "punch_clean",
    "take_waste_locked",
    "undo_allocation",
    "zero_recycled",
]

log = logging.getLogger("aiopgalloc")

_SYSTEM = MemoryKind.SYSTEM
Pieces = list[tuple[int, int, bool]]  # (start, end, known committed)


def find_range_locked(mf: MemoryFile, length: int, align: int) -> tuple[int, Pieces]:
    """Choose where an allocation goes; return its start and the waste
    pieces inside it.  Precondition: _mu held.  No mutation."""
    usage, waste = mf._usage, mf._waste
    a = usage.first_fit(length, 0, align)
    if a is None:
        raise OSError(errno.ENOMEM, "memory file offsets exhausted")
    if not waste:
        return a, []
    w = waste.lower_bound(a)
    if w is None or w[0] >= a + length:
        return a, []
    if w[0] <= a and w[1] >= a + length and length <= mf.opts.recycle_max_bytes:
        return a, [w]  # the common case: one freed range holds it all
    pieces = list(waste.segments(a, a + length))
    if not pieces or length <= mf.opts.recycle_max_bytes:
        return a, pieces
    # Large request over dirty pages: look for clean room inside the file,
    # stepping past waste; a bounded number of tries keeps this O(log n).
    key = pieces[-1][1]
    for _ in range(32):
        b = usage.first_fit(length, key, align)
        if b is None or b + length > mf._file_size:
            break
        in_b = list(waste.segments(b, b + length))
        if not in_b:
            return b, []
        key = in_b[-1][1]
    return a, pieces


def take_waste_locked(
    mf: MemoryFile, start: int, end: int, pieces: Pieces, kind: MemoryKind
) -> Pieces:
    """Insert the live segment(s) for a new allocation, taking the waste
    pieces inside it.  Returns the recycled ranges to zero, with their
    known-committed flag.  Precondition: _mu held, [start, end) is a gap
    of _usage."""
    usage = mf._usage
    live = LIVE[kind]
    if not pieces:
        usage.add(start, end, live[False])
        return []
    acct = mf.accounting
    waste = mf._waste
    recycled: Pieces = []
    cur = start
    for ws, we, committed in pieces:
        s, e = max(ws, start), min(we, end)
        if cur < s:
            usage.add(cur, s, live[False])
        n = e - s
        waste.carve(s, e)
        if committed:
            # Still committed once zeroed: the bytes change kind.
            acct._move_unchecked(n, kind, _SYSTEM)
        usage.add(s, e, live[committed])
        recycled.append((s, e, committed))
        mf.recycled_bytes += n
        cur = e
    if cur < end:
        usage.add(cur, end, live[False])
    return recycled


def zero_recycled(mf: MemoryFile, recycled: Pieces) -> None:
    """Zero recycled pages, outside the lock.  Pages known committed are
    memset.  For the others one SEEK_DATA (bounded: it only skips holes)
    finds the first page holding data; the pages before it are holes and
    read as zero already, so pages never touched are not faulted in just
    to be zeroed.  (SEEK_HOLE would walk the data run to its end, however
    far past the range that is.)
    """
    zero = mf._mappings.zero
    for s, e, known in recycled:
        if not known:
            d = syscalls.seek_data(mf._scan_fd, s)
            if d is None or d >= e:
                continue
            s = d
        zero(s, e - s)


def commit_pages(mf: MemoryFile, start: int, end: int, kind: MemoryKind, mode: CommitMode) -> None:
    """Commit a fresh allocation's pages, then count them known committed.

    In a memory cgroup with a limit the commit goes in steps that each
    check the cgroup's headroom first (``cgroup.commit_in_steps``): a
    request that does not fit raises ``OSError(ENOMEM)`` instead of the
    kernel's OOM killer ending the process; the caller undoes the steps."""
    step: Callable[[int, int], None]
    if mode is CommitMode.FALLOCATE:
        step = functools.partial(syscalls.commit, mf._fd)
    else:
        step = mf._mappings.populate
    cgroup.commit_in_steps(start, end - start, step)
    with mf._mu:
        usage, acct = mf._usage, mf.accounting
        live = LIVE[kind]
        for s, e, v in list(usage.segments(start, end)):
            if v is not live[False]:
                continue
            a, b = max(s, start), min(e, end)
            usage.isolate(a, b)
            usage.set_value(a, live[True])
            acct._inc_unchecked(b - a, kind)
            mf._known_committed += b - a
        usage.merge_range(start, end)
        usage.merge_adjacent(start, end)


def punch_clean(mf: MemoryFile, start: int, end: int, recycled: Pieces) -> None:
    """Punch the clean (not recycled) pages of [start, end) back out, after a
    failed commit may have committed some of them.  Logs what fails."""
    clean: list[tuple[int, int]] = []
    cur = start
    for s, e, _ in recycled:
        if cur < s:
            clean.append((cur, s))
        cur = e
    if cur < end:
        clean.append((cur, end))
    for s, e, err in syscalls.punch_holes(mf._fd, clean):
        log.warning("could not punch %s after a failed commit: %s", FileRange(s, e), err)


def undo_allocation(
    mf: MemoryFile, start: int, end: int, recycled: Pieces, kind: MemoryKind
) -> None:
    """Undo an allocation whose recycled pages could not be zeroed: the
    recycled pieces go back to the waste set as they were (dirty, with
    their committed flag), the clean pieces become clean again."""
    with mf._mu:
        if mf._closed:
            return
        mf._usage.remove_range(start, end)
        for s, e, committed in recycled:
            if committed:
                mf.accounting._move_unchecked(e - s, _SYSTEM, kind)
            mf._waste.add(s, e, committed)
            mf.recycled_bytes -= e - s
        mf.allocations -= 1
        mf._wake_releaser_locked()
