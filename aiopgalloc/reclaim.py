"""The releaser: returns freed pages to the kernel, off the event loop.

One task per memory file, in the file's task group.  It loops:

1. take a batch of freed ranges (``MemoryFile._take_release_batch``: pure
   bookkeeping under the file's lock; the pages become "releasing", so no
   allocation may recycle them while they are punched);
2. punch them (``fallocate(PUNCH_HOLE)``) without the lock: on the event
   loop when the batch is small, in a worker thread otherwise;
3. settle the books (``_finish_release``) and tell waiters.

When there is nothing to release it waits on an eventfd that ``dec_ref``
signals, from whatever thread freed the pages, without needing the loop.

Which side of the thread hop
----------------------------
A ``to_thread`` round trip costs 0.3-0.6 ms here, while punching one 4 KiB
page costs about 5 us and a 2 MiB range about 0.3 ms.  A batch of a few
small ranges is therefore cheaper to punch inline than to ship to a thread,
and the loop is held for well under a millisecond; anything larger goes to
a thread (``MemoryFileOpts.release_inline_max_bytes`` / ``..._ranges``).
Freed ranges are merged as they are freed (the waste set is kept maximally
merged), so neighbouring frees become one punch; each punch is capped at
128 MiB because Linux serialises fallocate calls on a shmem file, and one
huge punch would hold up every other fallocate on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.lowlevel

from .errors import RefCountError
from .host import syscalls
from .host.epoll import drain_eventfd
from .ranges import FileRange
from .usage import RELEASING, MemoryKind

if TYPE_CHECKING:
    from .memory_file import MemoryFile

log_release = logging.getLogger("aiopgalloc.reclaim")

__all__ = ["DecommitPlan", "ReleaseBatch", "decommit", "run_releaser"]

log = logging.getLogger("aiopgalloc.reclaim")

_ERROR_BACKOFF = 0.5  # seconds to wait after a batch failed outright


@dataclass(slots=True)
class ReleaseBatch:
    """Pages taken from the waste set to be punched out (a decision, as data).

    ``pieces`` are the waste ranges taken, with their known-committed flag;
    ``ranges`` the same bytes cut into fallocate-sized calls, sorted;
    ``committed_bytes`` of them were known committed (counted as SYSTEM).  ``failed`` is filled by
    whoever performs the batch with the ranges whose punch failed (they were
    zeroed by hand instead); ``performed`` says the batch ran at all.
    """

    pieces: list[tuple[int, int, bool]]
    ranges: list[tuple[int, int]]
    committed_bytes: int
    nbytes: int
    failed: list[tuple[int, int, OSError]] = field(default_factory=list)
    performed: bool = False


@dataclass(slots=True)
class DecommitPlan:
    """What ``decommit`` must punch: live ranges (stay allocated, become
    uncommitted) and waste ranges (released on the way)."""

    live: list[tuple[int, int]]
    waste: ReleaseBatch


def take_release_batch(
    mf: MemoryFile, max_bytes: int = 1 << 30, max_ranges: int = 4096
) -> ReleaseBatch | None:
    """Take waste from the lowest address up (whole merged ranges, each cut
    at 128 MiB since Linux serialises fallocate on shmem) and mark it
    releasing.  Returns None when there is no waste.  Takes _mu."""
    with mf._mu:
        mf._wake_pending = False
        if mf._closed or not mf._waste:
            return None
        pieces: list[tuple[int, int, bool]] = []
        total = 0
        for seg in mf._waste:
            pieces.append(seg)
            total += seg[1] - seg[0]
            if total >= max_bytes or len(pieces) >= max_ranges:
                break
        return take_waste_batch_locked(mf, pieces)


def take_waste_batch_locked(mf: MemoryFile, pieces: list[tuple[int, int, bool]]) -> ReleaseBatch:
    ranges: list[tuple[int, int]] = []
    committed = total = 0
    step = 128 << 20
    for s, e, c in pieces:
        mf._waste.remove_range(s, e)
        mf._usage.insert_without_merging(s, e, RELEASING)
        n = e - s
        total += n
        if c:
            committed += n
        for p in range(s, e, step):
            ranges.append((p, min(p + step, e)))
    mf._releasing += total
    mf._releasing_committed += committed
    return ReleaseBatch(pieces, ranges, committed, total)


def finish_release(mf: MemoryFile, batch: ReleaseBatch) -> None:
    """Bookkeeping after a batch ran (or was abandoned).  Takes _mu."""
    with mf._mu:
        usage = mf._usage
        if not batch.performed:
            # Never punched (cancelled before it ran): back to waste as it was.
            for s, e, c in batch.pieces:
                usage.remove_range(s, e)
                mf._waste.add(s, e, c)
            mf._releasing -= batch.nbytes
            mf._releasing_committed -= batch.committed_bytes
            return
        for s, e in batch.ranges:
            usage.remove_range(s, e)
        mf._releasing -= batch.nbytes
        mf._releasing_committed -= batch.committed_bytes
        if batch.committed_bytes:
            mf.accounting.dec(batch.committed_bytes, MemoryKind.SYSTEM)
            mf._known_committed -= batch.committed_bytes
        mf._note_punched_locked(batch.ranges)
        mf.releases += 1
        mf.bytes_released += batch.nbytes


def perform(mf: MemoryFile, ranges: list[tuple[int, int]]) -> list[tuple[int, int, OSError]]:
    """Punch ranges; zero by hand any whose punch failed (the reference's
    fallback: memory stays used, but the pages read as zero again).
    Runs outside _mu, on the loop or in a worker thread."""
    failed = syscalls.punch_holes(mf._fd, ranges)
    for s, e, err in failed:
        log.warning("punching %s failed (%s); zeroing it by hand", FileRange(s, e), err)
        mf._mappings.zero(s, e - s)
    return failed


def perform_release(mf: MemoryFile, batch: ReleaseBatch) -> None:
    """Run a release batch: punch it, zero by hand what failed.  Runs outside
    the lock, on the loop or in a worker thread."""
    batch.failed = perform(mf, batch.ranges)
    batch.performed = True


def plan_decommit(mf: MemoryFile, start: int, end: int) -> DecommitPlan:
    with mf._mu:
        mf._check_open()
        live: list[tuple[int, int]] = []
        cur = start
        waste_pieces: list[tuple[int, int, bool]] = []
        while cur < end:
            seg = mf._usage.find(cur)
            if seg is not None:
                if seg[2].refs == 0:
                    raise RefCountError(f"decommit: pages at {cur:#x} are being released already")
                nxt = min(seg[1], end)
                live.append((cur, nxt))
            else:
                w = mf._waste.find(cur)
                if w is None:
                    raise RefCountError(
                        f"decommit: pages {FileRange(cur, mf._next_start(cur, end))} are "
                        "not allocated"
                    )
                nxt = min(w[1], end)
                waste_pieces.append((cur, nxt, w[2]))
            cur = nxt
        batch = take_waste_batch_locked(mf, waste_pieces)
        mf._note_punched_locked(live + batch.ranges)
        return DecommitPlan(live, batch)


def finish_decommit(mf: MemoryFile, plan: DecommitPlan) -> None:
    finish_release(mf, plan.waste)
    with mf._mu:
        usage, acct = mf._usage, mf.accounting
        for s, e in plan.live:
            for ss, se, v in list(usage.segments(s, e)):
                if v.refs == 0 or not v.known_committed:
                    continue
                a, b = max(ss, s), min(se, e)
                usage.isolate(a, b)
                usage.set_value(a, v._replace(known_committed=False))
                acct.dec(b - a, v.kind)
                mf._known_committed -= b - a
            usage.merge_range(s, e)
            usage.merge_adjacent(s, e)
        mf._note_punched_locked(plan.live)


def small_batch(mf: MemoryFile, nbytes: int, nranges: int) -> bool:
    o = mf.opts
    return nbytes <= o.release_inline_max_bytes and nranges <= o.release_inline_max_ranges


async def decommit(mf: MemoryFile, start: int, end: int) -> None:
    """Punch [start, end) out (the body of ``MemoryFile.decommit``)."""
    plan = plan_decommit(mf, start, end)
    ranges = plan.live + plan.waste.ranges
    try:
        if small_batch(mf, end - start, len(ranges)):
            plan.waste.failed = perform(mf, ranges)
        else:
            plan.waste.failed = await anyio.to_thread.run_sync(
                perform, mf, ranges, limiter=mf._limiter
            )
        plan.waste.performed = True
    except BaseException:
        # Neither punched nor zeroed by hand: leave the books as they were
        # (a call that raises changes nothing).  The freed pages go back to
        # the waste set; the live pages keep their flags.
        finish_release(mf, plan.waste)
        mf._on_progress()
        raise
    finish_decommit(mf, plan)
    mf._on_progress()


async def run_releaser(
    mf: MemoryFile, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Release freed pages until cancelled (the file closing)."""
    limiter = anyio.CapacityLimiter(1)
    wake_fd = mf._wake_fd
    task_status.started()
    while True:
        batch = take_release_batch(mf)
        if batch is None:
            mf._on_progress()
            if mf._evictions is not None:
                mf._evictions.on_releaser_idle()
            await anyio.wait_readable(wake_fd)
            drain_eventfd(wake_fd)
            continue
        failed = False
        try:
            if small_batch(mf, batch.nbytes, len(batch.ranges)):
                perform_release(mf, batch)
            else:
                await anyio.to_thread.run_sync(perform_release, mf, batch, limiter=limiter)
        except Exception:
            failed = True
            log.exception("releasing %d bytes failed; will retry", batch.nbytes)
        finally:
            finish_release(mf, batch)
        mf._on_progress()
        if failed:
            await anyio.sleep(_ERROR_BACKOFF)
        else:
            await anyio.lowlevel.checkpoint()
