"""Usage scans: finding which live pages the kernel has committed.

``update_usage`` keeps ``MemoryFile.accounting`` honest.  The cheap check
comes first: fstat's block count is what the kernel holds for the file, and
when it equals the bytes the allocator already knows to be committed there
is nothing to find.  Otherwise the live ranges not yet known committed are
scanned.

How to scan
-----------
Two kernel interfaces tell which pages of a shmem file hold memory.
``lseek(SEEK_DATA/SEEK_HOLE)`` looks cheap, but on shmem SEEK_HOLE walks a
data run to its end, wherever that is, so asking about a small range next
to a large committed region costs time in proportion to that region (1.7 ms
per 256 MiB measured here), for every range asked about.  ``mincore`` on the
mapping costs in proportion to the range asked about and nothing else
(about 11 ms per GiB, one byte per page), and C-level ``bytes.find`` walks
its answer.  We use mincore, as the reference does.  It does not see pages
swapped out (there is no swap on these machines; with swap, such pages show
up again once touched) nor pages committed by ``fallocate`` and never
written; fstat sees both, which is why the skip check uses fstat.

The scan runs in a worker thread without the lock.  Pages may be punched
meanwhile (a release or a decommit): every punch bumps ``_commit_seq`` and
is remembered (the last 8,192 ranges); a scan whose sequence number is stale
leaves out the pages punched since it was planned, so a page punched during
the scan is never marked committed, and a scan racing with a busy releaser
still counts everything else.  Only when more punches happened than are
remembered is the scan redone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from .host import syscalls
from .ranges import PAGE_SIZE
from .usage import LIVE

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = ["update_usage"]

log = logging.getLogger("aiopgalloc")

_MAX_ATTEMPTS = 8

# mincore defines only bit 0 of each byte ("resident"): map every byte to 0/1.
_RESIDENT = bytes(i & 1 for i in range(256))


def plan_scan(mf: MemoryFile) -> tuple[int, list[tuple[int, int]]] | None:
    """Live ranges not known committed, merged; None if fstat says the
    accounting is exact already.  The caller holds an I/O lease."""
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


def _subtract(runs: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` minus the ranges in ``cut`` (both lists of half-open ranges)."""
    out: list[tuple[int, int]] = []
    cut = sorted(cut)
    for rs, re_ in runs:
        pieces = [(rs, re_)]
        for cs, ce in cut:
            if ce <= rs:
                continue
            if cs >= re_:
                break
            nxt: list[tuple[int, int]] = []
            for ps, pe in pieces:
                if ce <= ps or cs >= pe:
                    nxt.append((ps, pe))
                    continue
                if ps < cs:
                    nxt.append((ps, cs))
                if ce < pe:
                    nxt.append((ce, pe))
            pieces = nxt
        out.extend(pieces)
    return out


def apply_scan(mf: MemoryFile, seq: int, runs: list[tuple[int, int]]) -> bool:
    """Mark resident runs known committed.  Pages punched since the scan
    was planned are left out (their residency may be stale).  Returns False,
    changing nothing, only when too many punches happened to know which: the
    caller rescans."""
    with mf._mu:
        if mf._closed:
            return True
        if seq != mf._commit_seq:
            if mf._punched_dropped > seq:
                return False
            runs = _subtract(runs, [(s, e) for q, s, e in mf._punched if q > seq])
        usage, acct = mf._usage, mf.accounting
        for rs, re_ in runs:
            for s, e, v in list(usage.segments(rs, re_)):
                if v.refs == 0 or v.known_committed:
                    continue
                a, b = max(s, rs), min(e, re_)
                # Cut the piece out and put it back marked committed: add
                # merges it with whichever neighbours now match.  Two
                # lookups, where isolate + set_value + the merges took
                # about eight (this loop runs once per resident run).
                usage.carve(a, b)
                usage.add(
                    a, b, LIVE[v.kind][True] if v.refs == 1 else v._replace(known_committed=True)
                )
                acct.inc(b - a, v.kind)
                mf._known_committed += b - a
        return True


def scan(mf: MemoryFile, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Resident runs inside ``spans`` (sorted, page-aligned), via mincore.

    Runs in a worker thread; touches only the mappings (which never move
    while the file is open)."""
    runs: list[tuple[int, int]] = []
    for s, e in spans:
        vec = mf._mappings.mincore(s, e - s).translate(_RESIDENT)
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


async def update_usage(mf: MemoryFile) -> None:
    """The body of ``MemoryFile.update_usage``.  Raises ``ClosedError`` if
    the file closed before the scan's result could be applied."""
    with mf._io():
        for _attempt in range(_MAX_ATTEMPTS):
            plan = plan_scan(mf)
            if plan is None:
                return
            seq, spans = plan
            if not spans:
                return
            runs = await anyio.to_thread.run_sync(scan, mf, spans, limiter=mf._limiter)
            if apply_scan(mf, seq, runs):
                mf._check_open()
                return
            await anyio.lowlevel.checkpoint()
    log.debug("update_usage: pages kept being punched during the scan; gave up")
