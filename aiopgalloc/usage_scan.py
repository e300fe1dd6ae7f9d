"""Usage scans: finding which live pages the kernel has committed.

``update_usage`` keeps ``MemoryFile.accounting`` honest.  The cheap check
comes first: fstat's block count is what the kernel holds for the file, and
when it equals the bytes the allocator already knows to be committed there
is nothing to find.  Otherwise the live ranges not yet known committed are
scanned.

How to scan
-----------
Two kernel interfaces tell which pages of a shmem file hold memory:
``mincore`` on a mapping (one byte per page, about 11 ms per GiB here, and
Python must then walk the byte vector) and ``lseek(SEEK_DATA/SEEK_HOLE)``
on the fd (two syscalls per committed run: 2-3 us for an empty GiB, about
1 ms for a 128 MiB run, but about 2 us per run when the runs are scattered
single pages).  SEEK_DATA also counts pages that were swapped out, which is
what "committed" means here (the reference counts swapped pages too), and it
needs no mapping.  We use SEEK_DATA, on a private fd so the offset of the fd
users see never moves.  Neither interface sees pages committed by
``fallocate`` but never written; fstat does, which is why the skip check
uses fstat.

The scan runs in a worker thread without the lock.  Pages may be punched
meanwhile (a release or a decommit): every punch bumps ``_commit_seq``, and
a scan whose sequence number is stale is thrown away and redone, so a page
that was punched during the scan is never marked committed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from .host import syscalls

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = ["update_usage"]

log = logging.getLogger("aiopgalloc")

_MAX_ATTEMPTS = 8


def plan_scan(mf: MemoryFile) -> tuple[int, list[tuple[int, int]]] | None:
    """Live ranges not known committed, merged; None if fstat says the
    accounting is exact already."""
    current = syscalls.fstat_blocks_bytes(mf._fd)
    with mf._mu:
        mf._check_open()
        if current == mf._known_committed:
            return None
        spans: list[tuple[int, int]] = []
        for s, e, v in mf._usage:
            if v.refs == 0 or v.known_committed:
                continue
            if spans and spans[-1][1] == s:
                spans[-1] = (spans[-1][0], e)
            else:
                spans.append((s, e))
        return mf._commit_seq, spans


def apply_scan(mf: MemoryFile, seq: int, runs: list[tuple[int, int]]) -> bool:
    """Mark resident runs known committed.  Returns False (changing
    nothing) if pages were punched meanwhile: the caller rescans."""
    with mf._mu:
        if mf._closed:
            return True
        if seq != mf._commit_seq:
            return False
        usage, acct = mf._usage, mf.accounting
        for rs, re_ in runs:
            changed = False
            for s, e, v in list(usage.segments(rs, re_)):
                if v.refs == 0 or v.known_committed:
                    continue
                a, b = max(s, rs), min(e, re_)
                usage.isolate(a, b)
                usage.set_value(a, v._replace(known_committed=True))
                acct.inc(b - a, v.kind)
                mf._known_committed += b - a
                changed = True
            if changed:
                usage.merge_range(rs, re_)
                usage.merge_adjacent(rs, re_)
        return True


def scan(mf: MemoryFile, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    fd = mf._scan_fd
    for s, e in spans:
        runs.extend(syscalls.data_ranges(fd, s, e))
    return runs


async def update_usage(mf: MemoryFile) -> None:
    """The body of ``MemoryFile.update_usage``."""
    for _attempt in range(_MAX_ATTEMPTS):
        plan = plan_scan(mf)
        if plan is None:
            return
        seq, spans = plan
        if not spans:
            return
        runs = await anyio.to_thread.run_sync(scan, mf, spans, limiter=mf._limiter)
        if apply_scan(mf, seq, runs):
            return
        await anyio.lowlevel.checkpoint()
    log.debug("update_usage: pages kept being punched during the scan; gave up")
