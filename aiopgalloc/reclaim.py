"""The releaser: returns freed pages to the kernel, off the event loop.

One task per memory file, in the file's task group.  It loops:

1. take a batch of freed ranges (``take_release_batch``: pure bookkeeping
   under the file's lock; the pages become "releasing", so no allocation
   may recycle them while they are punched);
2. punch them (``fallocate(PUNCH_HOLE)``) without the lock: on the event
   loop when the batch is small, in the releaser's worker thread otherwise;
3. settle the books (``finish_release``) and tell waiters.

When there is nothing to release it waits on an eventfd that ``dec_ref``
signals, from whatever thread freed the pages, without needing the loop.

Which side of the thread hop
----------------------------
A ``to_thread`` round trip costs 0.3-0.6 ms here, while punching one 4 KiB
page costs about 5 us and a 2 MiB range about 0.3 ms.  A batch of a few
small ranges is therefore cheaper to punch inline than to ship to a thread,
and the loop is held for well under a millisecond; anything larger goes to
a thread (``MemoryFileOpts.release_inline_max_bytes`` / ``..._ranges``).
Each punch is capped at 128 MiB because Linux serialises fallocate calls on
a shmem file, and one huge punch would hold up every other fallocate on it.

The worker thread and the GIL
-----------------------------
A worker waiting for the GIL asks for it only after a whole switch interval
(5 ms) in which the holder never let go.  A loop busy with ``dec_ref`` lets
go briefly at every ``await`` (epoll) and takes it straight back, which
restarts that wait, so with bursts of under 5 ms between awaits a plain
``to_thread`` worker starves: in the release benchmark its punches began
0.17-0.5 s late, once the frees were over, and the wait after the last free
was a whole serial punch (0.22-0.26 s for 1 GiB).  So the releaser has its
own worker thread (``_Puncher``) and hands the GIL over on purpose: it
blocks on the job's "started" event right after submitting (the worker
takes the GIL and enters fallocate, which lets it go), and, once the punch
should be over (``_PUNCH_BYTES_PER_S``), on its "done" event at each wake,
up to ``_HANDOFF`` (1 ms).  Measured there: 90 hand-overs, 9 ms in all,
93 us median, 0.8 ms at most; 45 batches punched while the frees went on,
and usage reads 0 some 2-6 ms after the last free.

When to punch: long runs now, lone short ranges later
-----------------------------------------------------
Freed ranges are merged as they are freed (the waste set is kept maximally
merged), so neighbouring frees become one punch, but only if they are still
waste when the neighbour comes.  Punching every freed page as soon as the
releaser wakes costs, per range, about 7 us of bookkeeping on the loop
(taking it out of the waste set, in and out of the usage set) plus a 5 us
punch, and it cuts the later merges short.  Freeing 1 GiB of 4 KiB pages,
evens first then odds (the release benchmark), that policy took batches of
3,000-4,096 single pages (25-37 ms of bookkeeping on the loop each): 2.4-2.7
s in all when the worker got the GIL, 1.4-1.7 s when it starved (the frees
alone take 1.1-1.3 s).

So the releaser takes at once only runs of at least ``RUN_BYTES`` (1 MiB:
there the 5 us per call is under 3% of the punch).  ``dec_ref`` notes the
start of each free that merged with other waste, or is that long by itself
(``MemoryFile._ready``, bounded; past the bound the releaser scans the
waste set once instead); the releaser looks those up, one lookup per run.
Lone short ranges stay in the waste set, where an allocation may recycle
them (a memset, cheaper than a punch plus the next fault), until

- the frees pause: no ``dec_ref`` for ``QUIET`` (20 ms);
- ``MAX_DEFER`` (5 s) has passed since they were first left waiting, so a
  steady stream of scattered frees still returns its memory (long enough
  not to cut into a burst like the benchmark's 0.5 s of lone frees, which
  would cost 28 ms on the loop per 4,096 ranges and the later merges);
- someone calls ``wait_for_reclaim`` (``MemoryFile._flush``).

Then every range goes, lowest first.  In the release benchmark the even pass
now leaves its pages alone and the odd pass merges them into one run growing
from offset 0, taken about 8 MiB at a time (one punch each) as it grows.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from bisect import bisect_left
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

__all__ = [
    "MAX_DEFER",
    "QUIET",
    "RUN_BYTES",
    "DecommitPlan",
    "ReleaseBatch",
    "decommit",
    "run_releaser",
]

log = logging.getLogger("aiopgalloc.reclaim")

_ERROR_BACKOFF = 0.5  # seconds to wait after a batch failed outright

RUN_BYTES = 1 << 20
"""A freed run at least this long is punched as soon as the releaser sees it."""
QUIET = 0.02
"""Seconds without a free after which short lone waste is released too."""
MAX_DEFER = 5.0
"""Short lone waste waits at most about this long, however busy the frees."""
_BATCH_BYTES = 1 << 30  # at most this much per release batch
_BATCH_RANGES = 4096  # and this many waste ranges (about 7 us each on the loop)
_HANDOFF = 0.001  # longest the loop blocks to hand the GIL to the puncher
_PUNCH_BYTES_PER_S = 8 << 30  # a 128 MiB punch of resident pages: about 16 ms here


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
    mf: MemoryFile,
    max_bytes: int = _BATCH_BYTES,
    max_ranges: int = _BATCH_RANGES,
    *,
    runs_only: bool = False,
) -> ReleaseBatch | None:
    """Take waste and mark it releasing; None when there is nothing to take.

    By default (and whenever ``wait_for_reclaim`` asked for it) all waste,
    from the lowest address up.  With ``runs_only``, just the freed runs of
    at least ``RUN_BYTES`` that ``dec_ref`` pointed at (see the module
    notes); short lone ranges stay where they are.  Takes _mu."""
    with mf._mu:
        mf._wake_pending = False
        waste = mf._waste
        if mf._closed or not waste:
            _forget_notes_locked(mf)
            return None
        pieces: list[tuple[int, int, bool]] = []
        if runs_only and not mf._flush:
            pieces = _ready_runs_locked(mf, max_bytes, max_ranges)
            if not pieces:
                return None
        else:
            total = 0
            for seg in waste:
                pieces.append(seg)
                total += seg[1] - seg[0]
                if total >= max_bytes or len(pieces) >= max_ranges:
                    break
        batch = take_waste_batch_locked(mf, pieces)
        if not waste:
            _forget_notes_locked(mf)
        return batch


def _forget_notes_locked(mf: MemoryFile) -> None:
    """No waste left: drop the notes of runs and any pending flush."""
    mf._ready.clear()
    mf._ready_overflow = mf._flush = False


def _ready_runs_locked(
    mf: MemoryFile, max_bytes: int, max_ranges: int
) -> list[tuple[int, int, bool]]:
    """The waste segments of at least ``RUN_BYTES`` holding a noted start,
    lowest first.  O(k log n) for k noted starts (a run holding many of
    them is looked up once); after an overflow, one pass over the waste."""
    waste = mf._waste
    pieces: list[tuple[int, int, bool]] = []
    total = 0
    if mf._ready_overflow:
        mf._ready_overflow = False
        mf._ready.clear()
        for seg in waste:
            if seg[1] - seg[0] >= RUN_BYTES:
                pieces.append(seg)
                total += seg[1] - seg[0]
                if total >= max_bytes or len(pieces) >= max_ranges:
                    # The rest is found again on the next pass.
                    mf._ready_overflow = True
                    break
        return pieces
    hints = mf._ready
    if not hints:
        return pieces
    mf._ready = []
    hints.sort()
    i, n = 0, len(hints)
    while i < n:
        found = waste.find(hints[i])
        if found is None:
            i += 1
            continue
        s, e, _ = found
        i = bisect_left(hints, e, i + 1)
        if e - s >= RUN_BYTES:
            pieces.append(found)
            total += e - s
            if total >= max_bytes or len(pieces) >= max_ranges:
                mf._ready.extend(hints[i:])
                break
    return pieces


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
    """Take the pages of [start, end) for punching; takes an I/O lease the
    caller returns.  Raises ``RefCountError``, ``ClosedError``."""
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
        mf._lease_locked()
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
    """Punch [start, end) out (the body of ``MemoryFile.decommit``).

    The plan holds an I/O lease until the punches are over, so a close
    meanwhile leaves the fd open under them; the call then raises
    ``ClosedError``."""
    plan = plan_decommit(mf, start, end)
    ranges = plan.live + plan.waste.ranges
    try:
        try:
            if small_batch(mf, end - start, len(ranges)):
                plan.waste.failed = perform(mf, ranges)
            else:
                plan.waste.failed = await anyio.to_thread.run_sync(
                    perform, mf, ranges, limiter=mf._limiter
                )
            plan.waste.performed = True
        except BaseException:
            # Neither punched nor zeroed by hand: leave the books as they
            # were (a call that raises changes nothing).  The freed pages go
            # back to the waste set; the live pages keep their flags.
            finish_release(mf, plan.waste)
            mf._on_progress()
            raise
        finish_decommit(mf, plan)
        mf._on_progress()
    finally:
        mf._unlease()
    mf._check_open()


class _Job:
    """One release batch for the puncher thread."""

    __slots__ = ("batch", "done", "error", "mf", "started")

    def __init__(self, mf: MemoryFile, batch: ReleaseBatch) -> None:
        self.mf = mf
        self.batch = batch
        self.started = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.started.set()
        try:
            perform_release(self.mf, self.batch)
        except BaseException as exc:  # handed to the releaser, which logs it
            self.error = exc
        finally:
            self.done.set()
            os.eventfd_write(self.mf._wake_fd, 1)


class _Puncher:
    """The releaser's own worker thread (started on first use, joined when
    the releaser ends), so that the releaser knows when the worker needs the
    GIL and can hand it over (see the module notes)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.run()

    def submit(self, job: _Job) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="aiopgalloc-releaser", daemon=True
            )
            self._thread.start()
        self._jobs.put(job)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


async def _punch_in_thread(mf: MemoryFile, puncher: _Puncher, batch: ReleaseBatch) -> None:
    """Run ``batch`` in the puncher thread; wait for it without blocking the
    loop, except for the short GIL hand-overs.  Raises what the batch
    raised.  On cancellation, waits for the batch (never leaves a punch
    running behind the file's back)."""
    job = _Job(mf, batch)
    puncher.submit(job)
    try:
        # Let the worker take the GIL and reach its syscall now.
        job.started.wait(_HANDOFF)
        ready_at = time.monotonic() + batch.nbytes / _PUNCH_BYTES_PER_S
        while not job.done.is_set():
            with mf._mu:
                mf._wake_pending = False  # the next dec_ref wakes us again
            await anyio.wait_readable(mf._wake_fd)
            drain_eventfd(mf._wake_fd)
            if time.monotonic() >= ready_at:
                # The punch should be over: the worker may be waiting for
                # the GIL, which a busy loop hardly ever lets go of.
                job.done.wait(_HANDOFF)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(job.done.wait)
        raise
    if job.error is not None:
        raise job.error


async def run_releaser(
    mf: MemoryFile, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Release freed pages until cancelled (the file closing)."""
    wake_fd = mf._wake_fd
    puncher = _Puncher()
    with mf._io():
        task_status.started()
        try:
            await _release_loop(mf, wake_fd, puncher)
        finally:
            puncher.close()


async def _release_loop(mf: MemoryFile, wake_fd: int, puncher: _Puncher) -> None:
    # Short lone waste waits (see the module notes).  ``flush`` is None while
    # only long runs are taken, else why everything goes: "quiet" (stops as
    # soon as frees resume) or "aged".
    flush: str | None = None
    deferred_since: float | None = None  # when short waste was first left waiting
    while True:
        if flush == "quiet" and mf._wake_pending:
            flush = None  # frees resumed: they may merge with what is left
        elif (
            flush is None
            and deferred_since is not None
            and anyio.current_time() - deferred_since >= MAX_DEFER
        ):
            flush = "aged"
        batch = take_release_batch(mf, _BATCH_BYTES, _BATCH_RANGES, runs_only=flush is None)
        if batch is None:
            flush = None
            mf._on_progress()
            with mf._mu:
                waiting = bool(mf._waste)
            if not waiting:
                deferred_since = None
                # Idle only with no waste left, deferred lone frees included
                # (ENABLED eviction without host pressure starts here).
                if mf._evictions is not None:
                    mf._evictions.on_releaser_idle()
                await anyio.wait_readable(wake_fd)
                drain_eventfd(wake_fd)
                continue
            if deferred_since is None:
                deferred_since = anyio.current_time()
            with anyio.move_on_after(QUIET):
                await anyio.wait_readable(wake_fd)
                drain_eventfd(wake_fd)
                continue
            flush = "quiet"  # no dec_ref for QUIET seconds
            continue
        if flush is not None and len(batch.pieces) < _BATCH_RANGES and batch.nbytes < _BATCH_BYTES:
            # Everything that was waiting is in this batch.
            flush = deferred_since = None
        failed = False
        try:
            if small_batch(mf, batch.nbytes, len(batch.ranges)):
                perform_release(mf, batch)
            else:
                await _punch_in_thread(mf, puncher, batch)
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
